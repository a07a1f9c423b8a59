//! What killed processes leave behind is repaired by the node's reconciler,
//! and state shared between state directories is respected, on real
//! microVMs: a `kiln snapshot` killed while it stages leaves no staging
//! directory once any command has looked; `kiln images rm` in one state
//! directory refuses an image that a snapshot of another state directory
//! on the same cache needs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Kiln, busybox, code, stderr, stdout};

fn ok_in(k: &Kiln, state: Option<&Path>, args: &[&str]) -> String {
    let mut c = k.cmd();
    if let Some(s) = state {
        c.env("KILN_STATE_DIR", s);
    }
    let out = c.args(args).output().expect("kiln runs");
    assert_eq!(
        code(&out),
        0,
        "kiln {args:?} failed: {}",
        stderr(&out).trim()
    );
    stdout(&out)
}

fn staging_dirs(state: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for store in ["snapshots", "templates"] {
        for e in std::fs::read_dir(state.join(store))
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with(".staging-") {
                out.push(e.path());
            }
        }
    }
    out
}

/// `kill -9` of `kiln snapshot` while the supervisor writes its staging
/// directory: the sandbox goes on, and the next `kiln ps` removes the
/// orphaned staging directory (it carries its owner's identity); a later
/// snapshot of the same sandbox works.
#[test]
fn a_killed_snapshot_leaves_no_staging_directory() {
    let k = Kiln::with_own_cache();
    let bb = busybox();
    let id = ok_in(
        &k,
        None,
        &[
            "run",
            "-d",
            "--memory",
            "512",
            &bb,
            "--",
            "sh",
            "-c",
            // Dirty memory so the snapshot takes a while to write.
            "dd if=/dev/urandom of=/dev/shm/x bs=1M count=200 2>/dev/null; echo up; sleep 600",
        ],
    )
    .trim()
    .to_string();
    let t0 = Instant::now();
    while !ok_in(&k, None, &["logs", &id]).contains("up") {
        assert!(t0.elapsed() < Duration::from_secs(120), "never up");
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut killed = 0;
    for attempt in 0..5 {
        let mut snap = k
            .cmd()
            .args(["snapshot", &id, "--name", &format!("s{attempt}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("kiln snapshot runs");
        // Wait until it stages, then kill it.
        let t0 = Instant::now();
        while staging_dirs(k.state_dir()).is_empty() && t0.elapsed() < Duration::from_secs(30) {
            if snap.try_wait().expect("wait").is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let staged = !staging_dirs(k.state_dir()).is_empty();
        let _ = snap.kill();
        let _ = snap.wait();
        if staged {
            killed += 1;
            break;
        }
    }
    assert_eq!(killed, 1, "no snapshot was caught while staging");
    // The supervisor may still be writing into it; wait for it to answer
    // again (the sandbox goes on either way).
    let t0 = Instant::now();
    loop {
        let out = k.run(&["exec", &id, "--", "echo", "alive"]);
        if code(&out) == 0 {
            assert_eq!(stdout(&out).trim(), "alive");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "exec after the killed snapshot: {}",
            stderr(&out)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Level-triggered: any command that reconciles removes it (the
    // supervisor may still be hashing into it for a moment, so look again
    // until it is gone, within a bound).
    let t0 = Instant::now();
    loop {
        ok_in(&k, None, &["ps"]);
        if staging_dirs(k.state_dir()).is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "left behind: {:?}",
            staging_dirs(k.state_dir())
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The sandbox still snapshots and restores.
    let name = ok_in(&k, None, &["snapshot", &id, "--name", "after"])
        .trim()
        .to_string();
    assert_eq!(name, "after");
    let restored = ok_in(&k, None, &["restore", "-d", "after"])
        .trim()
        .to_string();
    assert_eq!(
        ok_in(&k, None, &["exec", &restored, "--", "cat", "/proc/loadavg"])
            .split_whitespace()
            .count(),
        5
    );
    ok_in(&k, None, &["rm", "-f", &restored, &id]);
    ok_in(&k, None, &["snapshot", "rm", "after"]);
    k.assert_clean();
}

/// The `.work-*` directories of a template store.
fn work_dirs(state: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(state.join("templates"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".work-"))
        .map(|e| e.path())
        .collect()
}

/// `kill -9` of `template create` the moment its work directory appears
/// (it then makes the writable disk, before its VM starts): the next
/// command removes the directory. (It used to be kept for an hour, since
/// its owner was recorded only once the disk was made: the fault-injection
/// test below caught it as "template work dirs left".)
#[test]
fn a_template_create_killed_early_leaves_no_work_directory() {
    let k = Kiln::new();
    let bb = busybox();
    for attempt in 0..3 {
        let mut create = k
            .cmd()
            .args(["template", "create", "--memory", "288", &bb])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("kiln template create runs");
        let t0 = Instant::now();
        while work_dirs(k.state_dir()).is_empty() && t0.elapsed() < Duration::from_secs(60) {
            if create.try_wait().expect("wait").is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            !work_dirs(k.state_dir()).is_empty(),
            "template create ended before it made its work directory"
        );
        let _ = create.kill();
        let _ = create.wait();
        ok_in(&k, None, &["ps"]);
        assert!(
            work_dirs(k.state_dir()).is_empty(),
            "attempt {attempt}: left behind: {:?}",
            work_dirs(k.state_dir())
        );
        assert!(staging_dirs(k.state_dir()).is_empty(), "attempt {attempt}");
    }
    for name in ok_in(&k, None, &["template", "ls", "-q"]).lines() {
        ok_in(&k, None, &["template", "rm", name]);
    }
    k.assert_clean();
}

/// Two state directories on one image cache: a snapshot in the second
/// keeps the image from `kiln images rm` (and `prune`) in the first; once
/// the snapshot is gone the image can be removed.
#[test]
fn images_rm_sees_users_in_other_state_dirs() {
    let k = Kiln::with_own_cache();
    let bb = busybox();
    let other = tempfile::Builder::new()
        .prefix("kiln-e2e-other-")
        .tempdir_in("/tmp")
        .expect("second state dir");
    let b = Some(other.path());
    let id = ok_in(&k, b, &["run", "-d", &bb, "--", "sleep", "600"])
        .trim()
        .to_string();
    ok_in(&k, b, &["snapshot", &id, "--name", "keep"]);
    ok_in(&k, b, &["rm", "-f", &id]);
    // The first state directory has never used the image itself.
    let out = k.run(&["images", "rm", &bb]);
    assert_eq!(code(&out), 125, "stdout: {}", stdout(&out));
    let err = stderr(&out);
    // Named with its state directory, and how to reach it.
    assert!(
        err.contains(&format!(
            "snapshot keep of state directory {}",
            other.path().display()
        )),
        "{err}"
    );
    assert!(err.contains("KILN_STATE_DIR"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // -f only untags: the other directory's snapshot still restores.
    ok_in(&k, None, &["images", "rm", "-f", &bb]);
    ok_in(&k, None, &["images", "prune"]);
    let restored = ok_in(&k, b, &["restore", "-d", "keep"]).trim().to_string();
    assert_eq!(
        ok_in(&k, b, &["exec", &restored, "--", "echo", "hi"]).trim(),
        "hi"
    );
    ok_in(&k, b, &["rm", "-f", &restored]);
    ok_in(&k, b, &["snapshot", "rm", "keep"]);
    // Nothing uses it any more: prune removes the untagged image.
    let pruned = ok_in(&k, None, &["images", "prune"]);
    assert!(pruned.contains("removed sha256:"), "{pruned}");
    k.assert_clean();
}

/// A small deterministic generator (the seed is printed, so a failing
/// sequence can be replayed with `KILN_FAULT_SEED`).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n.max(1)
    }
}

/// `(id, status)` of every sandbox `kiln ps -a` shows.
fn ps_all(k: &Kiln) -> Vec<(String, String)> {
    let out = ok_in(k, None, &["ps", "-a"]);
    out.lines()
        .skip(1)
        .filter_map(|l| {
            let id = l.split_whitespace().next()?.to_string();
            // IMAGE is one field; STATUS may be two ("exited (0)").
            let rest: Vec<&str> = l.split("  ").filter(|f| !f.trim().is_empty()).collect();
            Some((
                id,
                rest.get(2)
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default(),
            ))
        })
        .collect()
}

/// The supervisor and VMM pids of sandbox `id`, from its record.
fn pids_of(k: &Kiln, id: &str) -> (Option<i32>, Option<i32>) {
    let rec: serde_json::Value =
        std::fs::read(k.state_dir().join("sandboxes").join(id).join("record.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
    let num = |v: &serde_json::Value| v.as_i64().map(|p| p as i32);
    (num(&rec["shim_pid"]), num(&rec["vm"]["pid"]))
}

/// `kill -9` of every Kiln process at random points of snapshot, fork,
/// restore, cp in and out, template create and pool claim (and of
/// supervisors and VMMs), many times; then: every sandbox is running and
/// usable or reported ended; every snapshot and template left is intact
/// (it restores); no staging or work directory, process, socket or VM file
/// is left that no command removes.
#[test]
fn kill_9_anywhere_loses_and_leaks_nothing() {
    let seed = std::env::var("KILN_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(7)
        });
    eprintln!("KILN_FAULT_SEED={seed}");
    let mut rng = Lcg(seed);
    let k = Kiln::new();
    let bb = busybox();
    let counter = "i=0; while true; do echo count $i; i=$((i+1)); sleep 0.2; done";
    let src = ok_in(&k, None, &["run", "-d", &bb, "--", "sh", "-c", counter])
        .trim()
        .to_string();
    ok_in(&k, None, &["template", "create", "--pool", "1", &bb]);
    let local = tempfile::tempdir().expect("tmp");
    let big = local.path().join("big.bin");
    std::fs::write(&big, vec![7u8; 24 << 20]).expect("write");
    let out_dir = local.path().join("out");
    std::fs::create_dir_all(&out_dir).expect("mkdir");
    ok_in(
        &k,
        None,
        &[
            "cp",
            big.to_str().expect("utf-8"),
            &format!("{src}:/data.bin"),
        ],
    );

    const ROUNDS: usize = 10;
    for round in 0..ROUNDS {
        let snaps: Vec<String> = ok_in(&k, None, &["snapshot", "ls", "-q"])
            .lines()
            .map(String::from)
            .collect();
        let others: Vec<String> = ps_all(&k)
            .into_iter()
            .filter(|(id, s)| *id != src && s == "running")
            .map(|(id, _)| id)
            .collect();
        let op = rng.next(9);
        let args: Vec<String> = match op {
            0 => vec![
                "snapshot".into(),
                src.clone(),
                "--name".into(),
                format!("f{round}"),
            ],
            1 => vec!["fork".into(), src.clone(), "-n".into(), "2".into()],
            2 if !snaps.is_empty() => {
                vec![
                    "restore".into(),
                    "-d".into(),
                    snaps[rng.next(snaps.len() as u64) as usize].clone(),
                ]
            }
            3 => vec![
                "cp".into(),
                big.display().to_string(),
                format!("{src}:/data.bin"),
            ],
            4 => vec![
                "cp".into(),
                format!("{src}:/data.bin"),
                out_dir.display().to_string(),
            ],
            5 => vec![
                "template".into(),
                "create".into(),
                "--memory".into(),
                "288".into(),
                bb.clone(),
            ],
            7 | 8 if !others.is_empty() => {
                // Kill a supervisor (7) or a VMM (8) of a sandbox other
                // than the source.
                let victim = &others[rng.next(others.len() as u64) as usize];
                let (shim, vmm) = pids_of(&k, victim);
                let pid = if op == 7 { shim } else { vmm };
                tracing::info!(round, op, victim = %victim, ?pid, "killing a sandbox process");
                if let Some(pid) = pid {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                vec![]
            }
            _ => vec![
                "run".into(),
                "-d".into(),
                bb.clone(),
                "--".into(),
                "sleep".into(),
                "600".into(),
            ],
        };
        if !args.is_empty() {
            let delay = Duration::from_millis(rng.next(1500));
            tracing::info!(round, ?args, ?delay, "kiln, then kill -9");
            let mut child = k
                .cmd()
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("kiln runs");
            std::thread::sleep(delay);
            let _ = child.kill();
            let _ = child.wait();
        }
        // Whatever state it left: any command reconciles.
        ok_in(&k, None, &["ps", "-a"]);
    }

    tracing::info!("checking: sandboxes, snapshots, templates, leftovers");
    // Give supervisors still finishing an interrupted operation a moment,
    // then every sandbox is either usable or reported ended.
    let t0 = Instant::now();
    loop {
        let all = ps_all(&k);
        let settling = all.iter().any(|(_, s)| s == "creating");
        if !settling || t0.elapsed() > Duration::from_secs(60) {
            for (id, status) in &all {
                if status == "running" {
                    let t1 = Instant::now();
                    loop {
                        let out = k.run(&["exec", id, "--", "echo", "ok"]);
                        if code(&out) == 0 && stdout(&out).trim() == "ok" {
                            break;
                        }
                        // A sandbox whose VMM was killed in the last round
                        // is shown running until its supervisor has seen
                        // the VMM exit; it must then be reported ended.
                        let now = ps_all(&k)
                            .into_iter()
                            .find(|(i, _)| i == id)
                            .map(|(_, s)| s)
                            .unwrap_or_default();
                        if now.starts_with("exited") || now.starts_with("failed") {
                            break;
                        }
                        assert!(
                            t1.elapsed() < Duration::from_secs(60),
                            "sandbox {id} is reported running but unusable (seed {seed}): {}",
                            stderr(&out)
                        );
                        std::thread::sleep(Duration::from_millis(300));
                    }
                } else {
                    assert!(
                        status.starts_with("exited")
                            || status.starts_with("failed")
                            || status == "paused",
                        "sandbox {id} is {status:?} (seed {seed})"
                    );
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // The source's counter went on through everything.
    let out = ok_in(
        &k,
        None,
        &["exec", &src, "--", "sh", "-c", "wc -c < /data.bin"],
    );
    assert_eq!(out.trim(), (24u64 << 20).to_string(), "seed {seed}");
    // Every published snapshot is intact: it restores and runs.
    for name in ok_in(&k, None, &["snapshot", "ls", "-q"]).lines() {
        let id = ok_in(&k, None, &["restore", "-d", name]).trim().to_string();
        assert_eq!(
            ok_in(&k, None, &["exec", &id, "--", "echo", "restored"]).trim(),
            "restored",
            "snapshot {name} (seed {seed})"
        );
        ok_in(&k, None, &["rm", "-f", &id]);
    }
    // Every template is usable here.
    let ls = ok_in(&k, None, &["template", "ls"]);
    for l in ls.lines().skip(1) {
        assert!(l.contains("ready"), "template not ready (seed {seed}): {l}");
    }
    // No temporaries whose owner is gone.
    let t0 = Instant::now();
    while !staging_dirs(k.state_dir()).is_empty() {
        ok_in(&k, None, &["ps"]);
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "left behind (seed {seed}): {:?}",
            staging_dirs(k.state_dir())
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let work = work_dirs(k.state_dir());
    assert!(
        work.is_empty(),
        "template work dirs left (seed {seed}): {work:?}"
    );
    let leaked = || -> Vec<PathBuf> {
        std::fs::read_dir(&out_dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(".kiln-cp-"))
            })
            .collect()
    };
    // A killed copy-out's temporary is removed by the next `kiln cp` into
    // that directory (issue 13, item 3; only one older than 2 s, so that
    // a copy just starting is never taken for a dead one).
    if !leaked().is_empty() {
        tracing::info!(leaked = ?leaked(), "copy-out temporaries of killed copies");
        std::thread::sleep(Duration::from_millis(2100));
        ok_in(
            &k,
            None,
            &[
                "cp",
                &format!("{src}:/etc/hostname"),
                &out_dir.display().to_string(),
            ],
        );
        assert!(
            leaked().is_empty(),
            "the next cp left (seed {seed}): {:?}",
            leaked()
        );
    }
    // Everything removed: nothing of it is left.
    for (id, _) in ps_all(&k) {
        ok_in(&k, None, &["rm", "-f", &id]);
    }
    for name in ok_in(&k, None, &["snapshot", "ls", "-q"]).lines() {
        ok_in(&k, None, &["snapshot", "rm", name]);
    }
    for name in ok_in(&k, None, &["template", "ls", "-q"]).lines() {
        ok_in(&k, None, &["template", "rm", name]);
    }
    k.assert_clean();
}
